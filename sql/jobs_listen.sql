-- Subscribe the workers' listener to the channel request_recommendations() notifies (service.sql).
LISTEN recommendation_jobs
