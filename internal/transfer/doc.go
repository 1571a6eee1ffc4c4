// Package transfer carries a VM bundle from one host to another as one
// byte stream, and receives it as untrusted input.
//
// # Stream format (version 1)
//
// All integers are big-endian.
//
//	magic    8 bytes  "VTPMBNDL"
//	version  1 byte   1
//	mlen     4 bytes  length of the manifest, at most 1 MiB
//	manifest mlen bytes of JSON: {"format":1,"vm":NAME,"uuid":UUID,
//	         "files":[{"path":P,"size":S,"data":D,"mode":M},…]}
//	then, for each file in the manifest's order:
//	  extents  repeated: offset (8 bytes), length (8 bytes), length bytes of data
//	  end      offset 0xffffffffffffffff, length 0
//	  digest   32 bytes: SHA-256 over every extent's offset, length and data
//	trailer  8 bytes  "VTPMEND\n", then the end of the stream
//
// A file's extents are the parts that hold data, in increasing order and
// not overlapping, each within its size; the holes of a sparse disk image
// are not sent, and the receiver leaves them holes. D is the sum of the
// extents' lengths: the manifest says up front how much data will arrive,
// so the receiver checks its free space before writing. A file's digest
// follows its data, so the sender reads each file once; the receiver hashes
// what it writes and refuses a file whose digest, size or data count
// differs. The stream's authenticity is the channel's (mutually
// authenticated TLS between hosts); the digests catch corruption,
// truncation and tampering below it.
//
// # What the receiver accepts
//
// Paths are relative, slash-separated, clean, without "." or "..", each
// name at most 255 bytes, at most 8 deep, unique, and no path is a
// directory of another. Every file is a regular file created new (O_EXCL,
// O_NOFOLLOW) in a staging directory the receiver made, so a stream cannot
// name links, devices or anything outside the bundle. Modes are permission
// bits only, with group and other write removed. Counts and sizes are
// bounded by [Limits]. Any failure removes the staging directory.
package transfer
