-- Send one notification (catalog refresh requests and their replies; see db.notify).
SELECT pg_notify(%(channel)s, %(payload)s)
