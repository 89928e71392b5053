"""`dlqproc console`: a web console for exhausted events (overview, list, detail, actions).

A thin front over dlqproc.exhausted: its filters, queries (db), replay engine
and audit trail; no query of its own.
- `auth`: pure; operator sessions, the token check and CSRF tokens;
- `forms`: pure; request values to a Filter (and back to a URL), and what
  the templates show (ages, the hourly chart, payloads);
- `app`: the aiohttp application: security headers, authentication, routes,
  replay jobs run in the console's process;
- `serve`: start-up checks (no token, no non-loopback address) and the server.
"""
