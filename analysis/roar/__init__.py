"""ROAR (remove and retrain): the removal rules and the run behind scripts/roar.py."""
