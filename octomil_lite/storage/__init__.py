"""Storage backends behind the MetadataStore and BlobStore interfaces."""
