-- Version 7: where each MQTT client id's session lives (Step 10). A node that accepts a
-- connection with a client id claims it: the row names the node and a token from one
-- sequence for all claims, so the newest claim of an id is the one with the highest token,
-- and every node is told of it (NOTIFY ferry_mqtt_clients). The row goes when the session
-- ends on its node.
CREATE SEQUENCE mqtt_claims;
CREATE TABLE mqtt_clients (
    client_id text PRIMARY KEY,
    node text NOT NULL,
    token bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
-- The will each connection leaves if its node dies with it (a PUBLISH packet, MQTT 5), under
-- the claim it came with; published by another node once its node is gone.
CREATE TABLE mqtt_wills (
    client_id text PRIMARY KEY,
    node text NOT NULL,
    token bigint NOT NULL,
    delay_secs bigint NOT NULL,
    will bytea NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
-- The newest retained message of each topic the cluster's nodes delivered from the log (a
-- PUBLISH packet, MQTT 5; NULL once cleared), where in the log it is; a node that starts
-- takes those it has none of.
CREATE TABLE mqtt_retained (
    topic text PRIMARY KEY,
    stream text NOT NULL,
    partition int NOT NULL,
    "offset" bigint NOT NULL,
    message bytea
);
