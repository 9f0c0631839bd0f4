"""The demo pipeline and its report (markdown + plots)."""
