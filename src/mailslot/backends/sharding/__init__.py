"""Storage spread over several databases (``[storage] urls``) by a consistent-hash ring."""
