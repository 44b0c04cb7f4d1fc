-- Bert4MusicRec schema for PostgreSQL 15+. Idempotent: running it again changes nothing.
-- The CHECK ranges on songs are mirrored by preprocessing_utils.FEATURE_RANGES, so the CSV
-- path accepts exactly the rows this database accepts.

SELECT pg_advisory_xact_lock(hashtext('bert4musicrec.schema'));

CREATE TABLE IF NOT EXISTS artists (
    artist_id bigint PRIMARY KEY,
    name      text NOT NULL,
    genre     text
);

CREATE TABLE IF NOT EXISTS albums (
    album_id     bigint PRIMARY KEY,
    name         text NOT NULL,
    artist_id    bigint REFERENCES artists (artist_id),
    release_year integer CHECK (release_year BETWEEN 1000 AND 3000)
);

CREATE TABLE IF NOT EXISTS songs (
    song_id          bigint PRIMARY KEY,
    name             text NOT NULL,
    album_id         bigint REFERENCES albums (album_id),
    artist_id        bigint REFERENCES artists (artist_id),
    explicit         boolean,
    danceability     real CHECK (danceability BETWEEN 0 AND 1),
    energy           real CHECK (energy BETWEEN 0 AND 1),
    key              smallint CHECK (key BETWEEN 0 AND 11),
    loudness         real CHECK (loudness BETWEEN -100 AND 20),
    mode             smallint CHECK (mode IN (0, 1)),
    speechiness      real CHECK (speechiness BETWEEN 0 AND 1),
    acousticness     real CHECK (acousticness BETWEEN 0 AND 1),
    instrumentalness real CHECK (instrumentalness BETWEEN 0 AND 1),
    liveness         real CHECK (liveness BETWEEN 0 AND 1),
    valence          real CHECK (valence BETWEEN 0 AND 1),
    tempo            real CHECK (tempo BETWEEN 0 AND 1000),
    duration_ms      integer CHECK (duration_ms > 0),
    time_signature   smallint CHECK (time_signature BETWEEN 0 AND 7),
    disc_number      smallint CHECK (disc_number >= 1),
    track_number     smallint CHECK (track_number >= 1)
);

CREATE TABLE IF NOT EXISTS playlists (
    playlist_id bigint PRIMARY KEY,
    name        text
);

CREATE TABLE IF NOT EXISTS playlist_songs (
    playlist_id bigint NOT NULL REFERENCES playlists (playlist_id) ON DELETE CASCADE,
    pos         integer NOT NULL CHECK (pos >= 0),
    song_id     bigint NOT NULL REFERENCES songs (song_id),
    PRIMARY KEY (playlist_id, pos)
);

CREATE INDEX IF NOT EXISTS playlist_songs_song_id_idx ON playlist_songs (song_id);
CREATE INDEX IF NOT EXISTS songs_album_id_idx ON songs (album_id);
CREATE INDEX IF NOT EXISTS songs_artist_id_idx ON songs (artist_id);
CREATE INDEX IF NOT EXISTS albums_artist_id_idx ON albums (artist_id);

-- Service tables (their use and tuning belong to flask_app.py).
CREATE TABLE IF NOT EXISTS recommendations (
    playlist_id   bigint NOT NULL REFERENCES playlists (playlist_id) ON DELETE CASCADE,
    rank          smallint NOT NULL CHECK (rank BETWEEN 1 AND 100),
    song_id       bigint NOT NULL REFERENCES songs (song_id),
    score         real NOT NULL,
    model_version text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (playlist_id, rank)
);

CREATE TABLE IF NOT EXISTS recommendation_jobs (
    job_id           bigserial PRIMARY KEY,
    playlist_id      bigint NOT NULL,
    k                smallint NOT NULL CHECK (k BETWEEN 1 AND 100),
    status           text NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    last_error       text,
    run_after        timestamptz NOT NULL DEFAULT now(),
    lease_expires_at timestamptz,
    worker           text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);

CREATE UNIQUE INDEX IF NOT EXISTS recommendation_jobs_one_active_idx
    ON recommendation_jobs (playlist_id) WHERE status IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS recommendation_jobs_status_run_after_idx
    ON recommendation_jobs (status, run_after);
CREATE INDEX IF NOT EXISTS recommendation_jobs_finished_at_idx
    ON recommendation_jobs (finished_at) WHERE status IN ('done', 'failed');
