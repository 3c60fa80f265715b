"""Provider adapters: one pure module per API (ARCHITECTURE.md "Provider adapter")."""
