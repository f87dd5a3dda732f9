"""`unmask viz`: pictures of a decode (positions by steps, coloured by confidence) as PNG and HTML."""

from unmask.viz.decode import committed_cells, render_decode, render_trace, token_label

__all__ = ["committed_cells", "render_decode", "render_trace", "token_label"]
