"""dlqproc: reprocesses dead-lettered NATS JetStream events."""

__version__ = "0.1.0"
