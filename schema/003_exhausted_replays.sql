-- Operating exhausted events (`dlqproc exhausted ...`): replays, replay jobs,
-- the audit trail, and indexes so that `list` with any single filter is fast.
-- Additive only: the operators' own queries and their
-- `UPDATE exhausted_events SET resolved = true ...` keep working unchanged.

-- replay_of: the row this one is a failed replay of (set by the trigger below);
-- replayed_at / replay_count: the last acknowledged replay and how many there were.
ALTER TABLE public.exhausted_events
    ADD COLUMN IF NOT EXISTS replay_of    bigint,
    ADD COLUMN IF NOT EXISTS replayed_at  timestamptz,
    ADD COLUMN IF NOT EXISTS replay_count integer NOT NULL DEFAULT 0;

-- A replay updates replayed_at and replay_count, which no index covers: with
-- room left on each page the update stays on its page (HOT) and writes no
-- index entry. Applies to the pages written from now on.
ALTER TABLE public.exhausted_events SET (fillfactor = 90);

-- `list` pages by id (newest first); each single filter has an index that
-- reaches its first page without reading the table.
CREATE INDEX IF NOT EXISTS exhausted_events_created_at ON public.exhausted_events (created_at);
CREATE INDEX IF NOT EXISTS exhausted_events_company_id_id ON public.exhausted_events (company_id, id);
CREATE INDEX IF NOT EXISTS exhausted_events_reason_id ON public.exhausted_events (reason, id);
-- A subject pattern's literal prefix is a LIKE 'prefix%' range on this index.
CREATE INDEX IF NOT EXISTS exhausted_events_subject_prefix
    ON public.exhausted_events (source_subject text_pattern_ops);
-- ... and its literal suffix (usually the tenant: v1.messages.*.acme) one on the reverse.
CREATE INDEX IF NOT EXISTS exhausted_events_subject_suffix
    ON public.exhausted_events (reverse(source_subject) text_pattern_ops);
CREATE INDEX IF NOT EXISTS exhausted_events_unresolved_id
    ON public.exhausted_events (id) WHERE NOT resolved;
CREATE INDEX IF NOT EXISTS exhausted_events_replay_of
    ON public.exhausted_events (replay_of) WHERE replay_of IS NOT NULL;

-- `--error TEXT` is a case-insensitive substring: a trigram index serves it
-- where pg_trgm can be installed (it is a trusted extension since PostgreSQL 13);
-- elsewhere the filter still works, by scanning.
DO $$
BEGIN
    BEGIN
        CREATE EXTENSION IF NOT EXISTS pg_trgm;
    EXCEPTION WHEN others THEN
        RAISE NOTICE 'pg_trgm unavailable (%), --error filters will scan', SQLERRM;
    END;
    IF EXISTS (SELECT 1 FROM pg_opclass WHERE opcname = 'gin_trgm_ops') THEN
        EXECUTE 'CREATE INDEX IF NOT EXISTS exhausted_events_last_error_trgm'
                ' ON public.exhausted_events USING gin (last_error gin_trgm_ops)';
    END IF;
END $$;

-- A bulk (or single) replay. Its filter is stored resolved (absolute times), so
-- a resumed job selects exactly what it selected; `cursor` is the highest row
-- id it has claimed, committed with the claims.
CREATE TABLE IF NOT EXISTS public.exhausted_replay_jobs (
    id               bigserial   PRIMARY KEY,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    actor            text        NOT NULL,
    state            text        NOT NULL DEFAULT 'running'
        CHECK (state IN ('running', 'paused', 'stopped', 'done', 'failed')),
    filter           jsonb       NOT NULL,
    target           text        NOT NULL CHECK (target IN ('source', 'dlq')),
    resolve          boolean     NOT NULL DEFAULT false,
    include_resolved boolean     NOT NULL DEFAULT false,
    rate             double precision,
    max_rows         bigint,
    note             text,
    -- Rows replayed at or after this time by another job are not replayed
    -- again by this one (two jobs never both publish a row).
    not_before       timestamptz NOT NULL,
    cursor           bigint      NOT NULL DEFAULT 0,
    published        bigint      NOT NULL DEFAULT 0,
    refused          bigint      NOT NULL DEFAULT 0,
    failed           bigint      NOT NULL DEFAULT 0,
    skipped          bigint      NOT NULL DEFAULT 0,
    uncertain        bigint      NOT NULL DEFAULT 0,
    message          text
);

CREATE INDEX IF NOT EXISTS exhausted_replay_jobs_active
    ON public.exhausted_replay_jobs (created_at) WHERE state IN ('running', 'paused');

-- One row per exhausted row a job took: claimed before its publish, then
-- published / refused / failed (or uncertain: in flight when the job died, and
-- resumed after JetStream's duplicate window). A row is claimed by one job at a time.
CREATE TABLE IF NOT EXISTS public.exhausted_replay_items (
    job_id       bigint      NOT NULL REFERENCES public.exhausted_replay_jobs (id) ON DELETE CASCADE,
    exhausted_id bigint      NOT NULL,
    company_id   text        NOT NULL,
    state        text        NOT NULL
        CHECK (state IN ('claimed', 'published', 'refused', 'failed', 'uncertain')),
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    done_at      timestamptz,
    msg_id       text,
    stream_seq   bigint,
    duplicate    boolean,
    detail       text,
    -- md5(source_subject || ' ' || original_payload::text) of the row, taken
    -- when it is claimed (before its publish): see dlqproc_link_replay below.
    replay_key   text,
    PRIMARY KEY (job_id, exhausted_id)
);

CREATE UNIQUE INDEX IF NOT EXISTS exhausted_replay_items_one_claim
    ON public.exhausted_replay_items (exhausted_id) WHERE state = 'claimed';
CREATE INDEX IF NOT EXISTS exhausted_replay_items_row ON public.exhausted_replay_items (exhausted_id);
CREATE INDEX IF NOT EXISTS exhausted_replay_items_replay_key
    ON public.exhausted_replay_items (replay_key, claimed_at) WHERE replay_key IS NOT NULL;

-- Every operator action on a row: replay, resolve, unresolve, annotate, purge.
-- Kept when the row is purged.
CREATE TABLE IF NOT EXISTS public.exhausted_audit (
    id           bigserial   PRIMARY KEY,
    exhausted_id bigint      NOT NULL,
    company_id   text        NOT NULL,
    action       text        NOT NULL
        CHECK (action IN ('replay', 'resolve', 'unresolve', 'annotate', 'purge')),
    actor        text        NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    note         text,
    job_id       bigint,
    detail       jsonb
);

CREATE INDEX IF NOT EXISTS exhausted_audit_row ON public.exhausted_audit (exhausted_id, id);
CREATE UNIQUE INDEX IF NOT EXISTS exhausted_audit_one_replay_per_job
    ON public.exhausted_audit (exhausted_id, job_id) WHERE action = 'replay';

-- Replays by tenant and result, kept as totals so the service can report
-- dlq_replays_total from a table that stays small.
CREATE TABLE IF NOT EXISTS public.exhausted_replay_totals (
    company_id text   NOT NULL,
    result     text   NOT NULL,
    n          bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (company_id, result)
);

-- A replayed event that fails again arrives as a new exhausted row, through
-- the service's unchanged write path. Its subject and original payload are
-- those of the row replayed, so the replay's item (claimed before the publish,
-- so it is there before the replay can fail) names it. Exhausting must not
-- fail for an item reason, and nothing below depends on a row's values.
CREATE OR REPLACE FUNCTION public.dlqproc_link_replay() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- No EXCEPTION block: it would open a subtransaction per row, and a commit
    -- group of many exhausted rows would overflow the backend's subtransaction
    -- cache. Nothing here can fail on a row's values: jsonb always has a text
    -- form, md5 takes any text, and the lookup is one index probe.
    IF NEW.replay_of IS NULL AND NEW.original_payload IS NOT NULL THEN
        SELECT i.exhausted_id INTO NEW.replay_of
        FROM public.exhausted_replay_items i
        WHERE i.replay_key = md5(NEW.source_subject || ' ' || NEW.original_payload::text)
          AND i.state IN ('claimed', 'published')
          AND i.claimed_at > now() - interval '30 days'
        ORDER BY i.claimed_at DESC
        LIMIT 1;
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS exhausted_events_link_replay ON public.exhausted_events;
CREATE TRIGGER exhausted_events_link_replay
    BEFORE INSERT ON public.exhausted_events
    FOR EACH ROW EXECUTE FUNCTION public.dlqproc_link_replay();
