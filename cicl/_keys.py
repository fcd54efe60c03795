"""Key names written into AnnData, in one place."""

DEFAULT_KEY = "cicl"


def embedding_key(key_added: str) -> str:
    return f"X_{key_added}"
