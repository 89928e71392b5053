"""Operating exhausted events: find, inspect, replay (one or in bulk) and resolve them.

The layer under `dlqproc exhausted ...` (and the web console):
- `filters`: pure; parses the operator's filter values into a `Filter` and
  turns one into a WHERE clause of constant SQL text and named parameters;
- `refusals`: pure; which rows can be replayed, and what is published for them;
- its PostgreSQL side is `dlqproc.store.exhausted_ops` (psycopg stays in the store);
- `engine`: the replay engine (jobs, claims, rate, pauses, resume);
- `render`: pure; tables, NDJSON and the detail view for a terminal;
- `progress`: a replay job's progress bar on a terminal, plain lines elsewhere.
"""
