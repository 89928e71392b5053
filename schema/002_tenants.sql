-- The tenants dlqproc has admitted, one row per tenant id (verbatim, case
-- preserved: its schema is "daisi_" || tenant). A tenant is recorded when its
-- schema is first needed; tenants.maxNewPerHour counts the rows whose
-- created_at lies in the last hour, so every replica applies one limit.
-- dlq_tenants_known reports how many rows there are.
CREATE TABLE IF NOT EXISTS public.dlqproc_tenants (
    tenant     text        PRIMARY KEY,
    -- -infinity: the schema existed before dlqproc recorded it (backfilled
    -- below, or found on first use); such a tenant never counts as new.
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS dlqproc_tenants_created_at ON public.dlqproc_tenants (created_at);

-- The tenant schemas made before this table existed. Earlier versions
-- lower-cased tenant ids, so these are the lower-case ids; only names that a
-- tenant id can produce count.
INSERT INTO public.dlqproc_tenants (tenant, created_at)
SELECT substr(nspname, 7), '-infinity'
FROM pg_namespace
WHERE nspname LIKE 'daisi\_%'
  AND substr(nspname, 7) ~ '^[A-Za-z0-9][A-Za-z0-9_-]{0,56}$'
ON CONFLICT (tenant) DO NOTHING;
