"""What is left around aiohttp: hop-by-hop header rules and the listener's guards."""
