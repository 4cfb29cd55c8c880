-- Version 3: the `producers` table of version 1 goes. An idempotent producer's state (id,
-- epoch, sequence numbers) is in the header of every batch it sent, so it is committed with
-- the batch's `runs` row in the flush's transaction, and a node rebuilds it from the log's
-- tail (as Kafka does); a second copy in a table could only disagree with it.
DROP TABLE IF EXISTS producers;
