"""What a person sees of a run: artifacts (tables, summaries, links), progress, engine output."""
