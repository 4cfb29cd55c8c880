-- Version 4: the nodes on this store and database, each with a lease it renews (Step 10's
-- membership). A node whose lease ran out is gone for everyone; its row is deleted an hour
-- later by any node.
CREATE TABLE nodes (
    name text PRIMARY KEY,
    addrs jsonb NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    lease_until timestamptz NOT NULL
);
