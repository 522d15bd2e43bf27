"""Adapters that plug infgen into other libraries. Each imports the library it adapts on first use;
infgen itself never imports this package."""
