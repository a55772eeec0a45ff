"""nydus-stargz: eStargz layers served lazily by any nydus-core backend.

An eStargz layer is an ordinary ``tar.gz`` whose files start new gzip members and whose last
entry is a table of contents (``stargz.index.json``) located by a footer. The snapshotter reads
the footer and the TOC with ranged GETs (`nydus_stargz.detect`), turns the TOC into a RAFS v6
bootstrap whose single blob *is* the layer (`nydus_stargz.bootstrap`), and any backend serves
that bootstrap; the daemon decodes each chunk from its gzip member (`nydus_stargz.decoder`) and
checks it against the TOC's ``chunkDigest`` before caching or returning it.
"""
