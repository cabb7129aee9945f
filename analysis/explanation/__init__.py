"""Explanation: attributions of the compared models on the tweet's features, faithfulness, the resumable run."""
