"""Business logic between the controllers and the repositories: validation beyond types, caching."""
