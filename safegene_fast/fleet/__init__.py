"""Fleets of fine-tunes: ``protect`` one, ``batch`` many (a recipe), locally or on Ray."""
