"""mtser: multi-task speech emotion recognition — a distributed feature store plus a lightweight trainer.

`import mtser.featurestore` needs only numpy, zarr and fsspec; torch and Ray are imported where they are used.
"""
__version__ = "0.1.0"
