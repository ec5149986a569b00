"""The supervisor daemon, `overnight run`: keeps one worker alive until the run ends."""
