-- Messages that dlqproc could not reprocess: budget spent, or bad input.
-- The columns the operators' SQL uses come first and keep their names and types;
-- dlqproc's own columns follow. Lives in the default schema (public) so that the
-- operators' queries run unchanged on the default search path.
CREATE TABLE IF NOT EXISTS public.exhausted_events (
    id               bigserial PRIMARY KEY,
    created_at       timestamptz NOT NULL DEFAULT now(),
    company_id       text        NOT NULL,
    source_subject   text        NOT NULL,
    last_error       text,
    retry_count      integer,
    event_timestamp  timestamptz,
    dlq_payload      jsonb       NOT NULL,
    original_payload jsonb,
    resolved         boolean     NOT NULL DEFAULT false,
    resolved_at      timestamptz,
    notes            text,
    -- Classified cause (dlqproc.model.Reason), e.g. retries_exhausted, not_json.
    reason           text,
    -- Where the DLQ message came from; with the body digest they identify it,
    -- so a redelivery after a lost TERM cannot add a second row.
    dlq_stream       text,
    dlq_sequence     bigint,
    dlq_subject      text,
    payload_digest   text,
    -- The body exactly as received, kept when it was not storable as JSON.
    raw_payload      bytea
);

CREATE UNIQUE INDEX IF NOT EXISTS exhausted_events_dlq_message
    ON public.exhausted_events (dlq_stream, dlq_sequence, payload_digest);
CREATE INDEX IF NOT EXISTS exhausted_events_source_subject ON public.exhausted_events (source_subject);
CREATE INDEX IF NOT EXISTS exhausted_events_event_timestamp ON public.exhausted_events (event_timestamp);
CREATE INDEX IF NOT EXISTS exhausted_events_resolved ON public.exhausted_events (resolved);
CREATE INDEX IF NOT EXISTS exhausted_events_resolved_at ON public.exhausted_events (resolved_at);
CREATE INDEX IF NOT EXISTS exhausted_events_company_id ON public.exhausted_events (company_id);
