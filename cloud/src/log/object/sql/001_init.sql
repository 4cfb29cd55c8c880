-- Version 1 of the object backend's schema (docs/object-log.md, "The schema").
CREATE TABLE streams (
    name text PRIMARY KEY,
    partitions int NOT NULL,
    config jsonb NOT NULL
);
CREATE TABLE partitions (
    stream text NOT NULL REFERENCES streams (name) ON DELETE CASCADE,
    partition int NOT NULL,
    next_offset bigint NOT NULL DEFAULT 0,
    log_start bigint NOT NULL DEFAULT 0,
    bytes bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (stream, partition)
);
CREATE TABLE objects (
    id text PRIMARY KEY,
    key text NOT NULL UNIQUE,
    size bigint NOT NULL,
    created timestamptz NOT NULL DEFAULT now(),
    deleted_after timestamptz
);
CREATE TABLE runs (
    stream text NOT NULL,
    partition int NOT NULL,
    first_offset bigint NOT NULL,
    last_offset bigint NOT NULL,
    object text NOT NULL REFERENCES objects (id),
    byte_start bigint NOT NULL,
    byte_len bigint NOT NULL,
    crc bigint NOT NULL,
    first_timestamp bigint NOT NULL,
    max_timestamp bigint NOT NULL,
    PRIMARY KEY (stream, partition, first_offset),
    FOREIGN KEY (stream, partition) REFERENCES partitions (stream, partition) ON DELETE CASCADE
);
CREATE INDEX runs_by_object ON runs (object);
CREATE TABLE cursors (
    grp text NOT NULL,
    stream text NOT NULL,
    partition int NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (grp, stream, partition)
);
CREATE TABLE edge_seqs (
    edge text NOT NULL,
    class smallint NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (edge, class)
);
CREATE TABLE producers (
    producer_id bigint NOT NULL,
    stream text NOT NULL,
    partition int NOT NULL,
    epoch smallint NOT NULL,
    last_sequence int NOT NULL,
    last_offset bigint NOT NULL,
    PRIMARY KEY (producer_id, stream, partition)
);
CREATE TABLE amqp_state (
    key text PRIMARY KEY,
    value bytea NOT NULL
);
