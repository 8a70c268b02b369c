"""Data access: one repository per table group, over an asyncpg pool, returning plain rows or Structs."""
