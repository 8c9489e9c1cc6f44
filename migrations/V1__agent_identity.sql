-- paxos-commit: the identity of the agent that serves this database.
--
-- An agent finds its prepared transactions after a crash by the gid prefix
-- (coordinator group + participant id). Two agents with different ids on one
-- database would each miss the other's; this row lets an agent refuse to start
-- on a database that another participant already claims.
CREATE SCHEMA IF NOT EXISTS paxos_commit;

CREATE TABLE IF NOT EXISTS paxos_commit.agent (
    singleton         boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    participant       text        NOT NULL,
    coordinator_group text        NOT NULL,
    first_started     timestamptz NOT NULL DEFAULT now()
);
