// Package attest proves to a key service what a host booted, with the
// host's hardware TPM: the trusted ("tpm") mode of host attestation.
//
// The exchange, one round trip after the host says who it is:
//
//	host                                         key service
//	OpenHost: EK public (TCG EK template),
//	  AK (restricted ECDSA P-256 signing key,
//	  a primary in the endorsement hierarchy)
//	                 ── EK public, AK public ──►
//	                                             the EK must be the one registered for
//	                                             the host; the AK must be a restricted,
//	                                             fixedTPM signing key (CheckAK);
//	                                             NewSession: TPM2_MakeCredential in
//	                                             software (EK, AK name, random secret),
//	                                             a random nonce, an expiry
//	                 ◄── Challenge{credential, nonce} ──
//	Answer: TPM2_ActivateCredential with the
//	  EK (only the TPM holding the registered
//	  EK opens it, and only for a key named
//	  as the AK), TPM2_Quote over PCRs 0–7
//	  (SHA-256) with the nonce, PCR values,
//	  the measured-boot event log
//	                 ── Evidence ──►
//	                                             Session.Verify: secret, expiry, nonce,
//	                                             selection exactly PCRs 0–7 SHA-256,
//	                                             signature and PCR digest (go-attestation),
//	                                             the event log replayed to the quoted
//	                                             values, Secure Boot state from it
//	                                             Policy.Evaluate: the PCR values accepted
//	                                             for the host's hardware class, Secure
//	                                             Boot on
//
// Credential activation is what ties the AK to the registered TPM: the
// secret is encrypted to the EK and bound to the AK's name, so a host
// answering with it proves that its AK lives in the TPM holding the EK. The
// nonce, fresh per session, makes an old quote worthless; the session's
// expiry bounds how long a challenge may be answered.
//
// Refusals are data: [EvidenceError] (with a [Reason]) for evidence that
// does not prove what it claims, [PolicyError] naming the PCRs and the
// policy for a host that proved a boot the policy does not accept.
//
// The host side opens its TPM by a specification as the keystore does
// ("device:/dev/tpmrm0", "tcp:HOST:PORT", "unix:PATH", or a bare device
// path) and reads the event log from [DefaultEventLog] unless told
// otherwise. The package is pure Go: the TPM work is go-tpm's, the event log
// parsing and replay go-attestation's.
package attest
