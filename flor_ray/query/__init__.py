"""The query side: dataframe, SQL (sandboxed), plots and past checkpoints, over a store."""
