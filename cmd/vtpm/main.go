// Command vtpm is a virtual TPM 2.0 for virtual machines.
package main

func main() {}
