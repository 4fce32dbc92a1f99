"""Conversation storage: SQLite by default, PostgreSQL for several replicas."""
