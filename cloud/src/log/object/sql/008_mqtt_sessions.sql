-- Version 8: persistent MQTT sessions move between nodes (Step 10). Beside each claim, what
-- the claiming node last recorded of the session (about once a second while it changes):
-- subscriptions, QoS 2 receipts, messages in flight by log position, and per partition where
-- a node that resumes the session reads the log again from (JSON). NULL: no persistent
-- session to resume.
ALTER TABLE mqtt_clients ADD COLUMN session bytea;
