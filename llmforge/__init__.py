"""llmforge: raw text to a deployed, aligned assistant."""
__version__ = "0.1.0"
