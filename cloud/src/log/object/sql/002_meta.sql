-- Version 2: the node's metadata (`crate::meta`) beside the log (docs/object-log.md,
-- "The schema"). cursors, edge_seqs and amqp_state came with version 1.
CREATE TABLE meta_streams (
    name text PRIMARY KEY,
    config bytea NOT NULL
);
CREATE TABLE ingest_from (
    stream text NOT NULL,
    partition int NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (stream, partition)
);
