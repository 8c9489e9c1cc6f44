-- paxos-commit: proof of each branch's commit, the fence around PREPARE TRANSACTION,
-- and the audit of heuristic decisions.

-- A committed branch's proof. The agent inserts the row inside the branch's own
-- transaction, right before PREPARE TRANSACTION, so the row exists iff the branch
-- committed. Once the prepared transaction's gid is gone, this is how the agent
-- knows which way it was finished (COMMIT PREPARED of a gid that is gone succeeds
-- only if the row is here), and how an audit compares every database with the
-- group's decisions. Rows older than the agent's retention are pruned.
CREATE TABLE IF NOT EXISTS paxos_commit.committed (
    txid        text        PRIMARY KEY,
    participant text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS committed_at ON paxos_commit.committed (at);

-- Raises unless the session is inside the transaction of branch `txid`: the agent
-- runs it in the same batch right before PREPARE TRANSACTION, so PREPARE never runs
-- outside the branch (outside a transaction block PostgreSQL only warns, and would
-- prepare nothing, or the batch's own implicit transaction).
--
-- The agent sets paxos_commit.branch with SET LOCAL at BEGIN, so the marker ends
-- with the transaction. The marker alone could be forged with set_config at session
-- level; a transaction that began with the very command being run (now() equals
-- statement_timestamp()) is not the branch's, which always began in an earlier one.
CREATE OR REPLACE FUNCTION paxos_commit.assert_branch(txid text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    marker text := current_setting('paxos_commit.branch', true);
BEGIN
    IF marker IS DISTINCT FROM txid THEN
        RAISE EXCEPTION 'paxos_commit: not inside the transaction of branch %', txid
            USING ERRCODE = 'invalid_transaction_state',
                  DETAIL = format('the session is marked as branch %s', coalesce(marker, '(none)')),
                  HINT = 'a statement of the branch ended or left its transaction';
    END IF;
    IF now() = statement_timestamp() THEN
        RAISE EXCEPTION 'paxos_commit: the transaction of branch % began with this command', txid
            USING ERRCODE = 'invalid_transaction_state',
                  HINT = 'a statement of the branch ended or left its transaction';
    END IF;
END
$$;

-- Every heuristic decision an operator forced on this database: recorded as
-- 'attempting' in its own transaction before COMMIT/ROLLBACK PREPARED runs, then
-- updated with 'done' or the error.
CREATE TABLE IF NOT EXISTS paxos_commit.heuristic_log (
    id       bigserial   PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    operator text        NOT NULL,
    gid      text        NOT NULL,
    outcome  text        NOT NULL,
    result   text,
    checks   text
);
