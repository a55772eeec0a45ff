"""The snapshotter: gRPC service, metastore, filters, mount builders and labels."""
