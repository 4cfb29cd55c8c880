-- Version 5: leases (Step 10). One owner at a time per (kind, key) until `until` (the
-- database's clock); `token` grows by one each time the lease passes to another owner, and
-- work done under a lease checks (owner, token) in its own transaction: a node that lost
-- its lease (a pause, a partition) cannot act on it any more.
CREATE TABLE leases (
    kind text NOT NULL,
    key text NOT NULL,
    owner text NOT NULL,
    token bigint NOT NULL,
    until timestamptz NOT NULL,
    PRIMARY KEY (kind, key)
);
