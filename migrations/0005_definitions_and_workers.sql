-- Safe deploys and live topology (issue 12).

-- A run's cursor counts steps by position in the definition it started under: `definition`
-- is that definition's fingerprint, `prefix` the identity of the steps the run has reached
-- (engine/definition.py). A worker claims only runs whose prefix its own definition has.
-- `held` says why no live worker's definition fits a run; such a run waits out of the
-- ready index until one does, or until an operator moves or rolls it back.
ALTER TABLE run ADD COLUMN definition text;
ALTER TABLE run ADD COLUMN prefix text;
ALTER TABLE run ADD COLUMN held text;
CREATE INDEX run_held_idx ON run (saga) WHERE held IS NOT NULL;

-- Every definition a worker has served, so a run started under an old one can be read.
CREATE TABLE saga_definition (
    saga        text NOT NULL,
    fingerprint text NOT NULL,
    steps       jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (saga, fingerprint)
);

-- Workers announce themselves and what they serve; a worker whose heartbeat is older than
-- the liveness timeout is presumed dead.
CREATE TABLE worker (
    id           text PRIMARY KEY,
    host         text NOT NULL,
    pid          integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    heartbeat_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    stopped_at   timestamptz,
    sagas        jsonb NOT NULL DEFAULT '{}'  -- saga -> {"definition": fp, "accepted": [prefix]}
);

-- When a live worker last served the subscription's saga (NULL: never seen served).
ALTER TABLE subscription ADD COLUMN served_at timestamptz;
