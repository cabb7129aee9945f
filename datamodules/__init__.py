from datamodules.tweet_sentiment import TweetSentimentDataModule

__all__ = ["TweetSentimentDataModule"]
