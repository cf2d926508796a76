"""The query side: dataframe, SQL (sandboxed), captured output, plots and past
checkpoints, over a store; it reads the store and never writes it."""
