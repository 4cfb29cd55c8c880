-- Version 6: idempotent producers' sequence state, per (stream, partition, producer id): the
-- epoch and the last five batches (first sequence, last sequence, base offset), flattened.
-- Version 3 dropped a table of that name, holding that the batches' headers in the log were
-- the state; but a batch resent to another node while its first copy still waited for the
-- store was then appended twice (nothing in the commit saw the other). This table is read
-- and written in the flush's own transaction, under the partition's row lock, so it cannot
-- disagree with the runs committed with it. Rows of producers silent for 7 days are
-- removed by the collector.
CREATE TABLE producers (
    stream text NOT NULL,
    partition int NOT NULL,
    producer_id bigint NOT NULL,
    epoch smallint NOT NULL,
    recent bigint[] NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, partition, producer_id),
    FOREIGN KEY (stream, partition) REFERENCES partitions (stream, partition) ON DELETE CASCADE
);
