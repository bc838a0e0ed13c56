-- The schema itself: creating it, and the bookkeeping of applied migrations.
-- Placeholders: {q} is the schema, quoted; {schema} the validated name, for use in literals.
-- A `-- name: x` line starts statement x; names starting with `_` are fragments that other
-- statements include as {_name}. Whole-line comments are stripped when the files are loaded.

-- name: create_schema
CREATE SCHEMA IF NOT EXISTS {q}

-- name: create_versions
CREATE TABLE IF NOT EXISTS {q}.schema_version (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
)

-- name: versions_exist
SELECT to_regclass($1) IS NOT NULL

-- name: versions
SELECT version FROM {q}.schema_version ORDER BY version

-- name: record_version
INSERT INTO {q}.schema_version (version, name) VALUES ($1, $2)

-- name: search_path
SET LOCAL search_path TO {q}, public

-- name: lock
-- Held for the whole migration run, so that processes starting together apply each
-- migration once.
SELECT pg_advisory_lock(hashtext($1))

-- name: unlock
SELECT pg_advisory_unlock(hashtext($1))

-- name: drop_schema
DROP SCHEMA IF EXISTS {q} CASCADE
