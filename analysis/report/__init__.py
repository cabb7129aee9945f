"""Report: figures, the self-contained HTML pages and the text tables the commands print."""
