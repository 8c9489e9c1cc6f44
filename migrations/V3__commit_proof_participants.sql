-- paxos-commit: each commit proof names the transaction's participants, so that an audit
-- that finds the proof in one database knows which other databases must hold one too.
ALTER TABLE paxos_commit.committed ADD COLUMN IF NOT EXISTS participants text[];
