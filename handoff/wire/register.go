package wire

import (
	"encoding/binary"
	"fmt"
)

// Register is the payload of a Register frame: a BE joins an FE's
// scheduling (seed 4.10) with its own rules. Its address and control port
// are its session's Hello.
type Register struct {
	Weight   uint16
	Patterns []string // the BE's `rule = ADDR PATTERN` patterns, in order
}

// Bounds of a registration.
const (
	MaxRegisterRules   = 256
	MaxRegisterPattern = 4096
)

// MarshalBinary encodes the Register payload: weight, rule count, then each
// pattern's length and text.
func (r Register) MarshalBinary() ([]byte, error) {
	if len(r.Patterns) > MaxRegisterRules {
		return nil, fmt.Errorf("%w: %d rules", ErrFormat, len(r.Patterns))
	}
	b := binary.BigEndian.AppendUint16(nil, r.Weight)
	b = binary.BigEndian.AppendUint16(b, uint16(len(r.Patterns)))
	for _, p := range r.Patterns {
		if len(p) == 0 || len(p) > MaxRegisterPattern {
			return nil, fmt.Errorf("%w: pattern of %d bytes", ErrFormat, len(p))
		}
		b = binary.BigEndian.AppendUint16(b, uint16(len(p)))
		b = append(b, p...)
	}
	return b, nil
}

// UnmarshalBinary decodes a Register payload.
func (r *Register) UnmarshalBinary(b []byte) error {
	d := decoder{b: b}
	w := d.u16()
	n := d.u16()
	if d.err == nil && (n == 0 || n > MaxRegisterRules) {
		return fmt.Errorf("%w: %d rules", ErrFormat, n)
	}
	var pats []string
	for range n {
		l := d.u16()
		if d.err == nil && (l == 0 || l > MaxRegisterPattern) {
			return fmt.Errorf("%w: pattern of %d bytes", ErrFormat, l)
		}
		p := d.take(int(l))
		if d.err != nil {
			break
		}
		pats = append(pats, string(p))
	}
	switch {
	case d.err != nil:
		return d.err
	case len(d.b) != 0:
		return fmt.Errorf("%w: %d trailing bytes in register", ErrFormat, len(d.b))
	}
	*r = Register{Weight: w, Patterns: pats}
	return nil
}
