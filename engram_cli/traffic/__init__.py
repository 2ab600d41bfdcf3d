"""Row traffic: which rows a corpus reads, and how large a row cache must be for a hit rate.

`rows` maps windows to the rows they read and counts each row's lookups from the distinct
n-grams collision statistics count; `lru` gives an LRU cache's hit rates from reuse distances
(exact, or SHARDS-sampled at scale); `statistics` collects both during `inspect` and returns the
`TrafficReport` (coverage, cache hit rates, the hot rows that `hot_rows` writes).
"""
