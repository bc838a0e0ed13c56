-- scoopy schema, version 1.
-- Applied with search_path set to the target schema, so names here are unqualified.

-- Every message ever launched. Scoped messages remember the run and the step
-- instance that emitted them, so a rollback can find "what did instance N send".
CREATE TABLE message (
    id              uuid PRIMARY KEY,
    root_id         uuid NOT NULL,
    topic           text NOT NULL,
    payload         jsonb NOT NULL,
    context         jsonb,
    parent_run_id   uuid,
    parent_instance integer,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX message_root_idx ON message (root_id);
CREATE INDEX message_parent_idx ON message (parent_run_id, parent_instance)
    WHERE parent_run_id IS NOT NULL;

-- One row per saga run. Scheduling never scans the event log: "is this run ready?"
-- is the partial index run_ready_idx, which holds only runs that have work to do,
-- so its size does not grow with history.
CREATE TABLE run (
    id               uuid PRIMARY KEY,
    root_id          uuid NOT NULL,
    message_id       uuid NOT NULL REFERENCES message (id),
    saga             text NOT NULL,
    parent_id        uuid REFERENCES run (id),
    parent_instance  integer,           -- the parent's step instance that emitted our message
    parent_wait      integer,           -- the parent's wait (instance or rollback sub-step) we count in
    awaited          boolean NOT NULL DEFAULT false,  -- counted in the parent's `pending`
    lineage          uuid[] NOT NULL,   -- root id, then every run id from the root run to this one
    status           text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'active', 'committed', 'rolled_back',
                          'rollback_failed', 'skipped')),
    state            jsonb NOT NULL DEFAULT '{}',
    pending          integer NOT NULL DEFAULT 0,      -- unfinished children of the current wait
    failed           integer NOT NULL DEFAULT 0,      -- children of the current wait that failed
    ready_at         timestamptz,                     -- claimable from then on; NULL = waiting
    resume_at        timestamptz,                     -- durable sleep
    deadline_at      timestamptz,                     -- earliest deadline of the current path
    context          jsonb,
    failure          jsonb,             -- the run's own failure (why it rolled back)
    rollback_failure jsonb,             -- why its rollback failed
    result           jsonb,
    rollback_request jsonb,             -- set by a parent or an operator; applied at the next claim
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (message_id, saga)
);
CREATE INDEX run_ready_idx ON run (saga, ready_at) WHERE ready_at IS NOT NULL;
CREATE INDEX run_children_idx ON run (parent_id, parent_instance) WHERE parent_id IS NOT NULL;
CREATE INDEX run_root_idx ON run (root_id);

-- The append-only audit log. `seq` orders it: a sequence, not the wall clock.
CREATE TABLE event (
    seq               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    root_id           uuid NOT NULL,
    message_id        uuid,
    run_id            uuid,
    type              text NOT NULL,
    saga              text,
    step              text,
    phase             text,
    step_index        integer,
    instance          integer,
    iteration         integer,
    handler_iteration integer,
    lineage           uuid[] NOT NULL,
    worker            text,
    failure           jsonb,
    context           jsonb,
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX event_root_idx ON event (root_id, seq);

-- The handler registry: which saga listens on which topic. Persisted so that every
-- service sees the whole topology, and so that fan-out happens in the emitting
-- transaction.
CREATE TABLE subscription (
    topic      text NOT NULL,
    saga       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (topic, saga)
);

-- Cancellation requests. A run gives up when any element of its lineage is here.
CREATE TABLE cancellation (
    target     uuid PRIMARY KEY,
    root_id    uuid NOT NULL,
    failure    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
