"""Model conversion: the server-side pool and sandbox, and the converters that run only inside the sandboxed child."""
