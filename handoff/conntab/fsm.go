package conntab

import "fmt"

// Role says whose state machine a connection follows.
type Role uint8

const (
	FE Role = iota + 1
	BE
)

func (r Role) String() string {
	switch r {
	case FE:
		return "FE"
	case BE:
		return "BE"
	}
	return fmt.Sprintf("Role(%d)", uint8(r))
}

// Event is something that happens to a connection: a step of the handoff,
// a packet the packet path saw, or a timer.
type Event uint8

const (
	EvHandoffStart  Event = iota + 1 // this host begins migrating the connection away
	EvHandoffAcked                   // the new owner acknowledged the handoff
	EvHandoffFailed                  // the handoff did not happen
	EvRestored                       // BE: a connection was rebuilt here and committed
	EvFEAcked                        // BE: the FE now forwards to the connection's new BE
	EvSYN                            // packet: SYN
	EvFIN                            // packet: FIN
	EvRST                            // packet: RST
	EvACK                            // packet: no payload, no FIN/RST/SYN
	EvPayload                        // packet: payload this host serves itself
	EvReschedule                     // BE packet: payload that the rules send to another BE
	EvTimer                          // TIME_WAIT or idle time ran out
	numEvents
)

var eventNames = [...]string{"", "handoff-start", "handoff-acked", "handoff-failed", "restored", "fe-acked",
	"syn", "fin", "rst", "ack", "payload", "reschedule", "timer"}

func (e Event) String() string {
	if int(e) < len(eventNames) && e > 0 {
		return eventNames[e]
	}
	return fmt.Sprintf("Event(%d)", uint8(e))
}

// Action is what the packet path does with the packet behind a packet
// event (the seed's per-state list, 4.8.3).
type Action uint8

const (
	ActNone     Action = iota // not a packet event
	ActDeliver                // to the local stack
	ActDrop                   // dropped (HANDOFFING: keep the handoff atomic)
	ActForward                // to the connection's BE, in the kernel
	ActSchedule               // BE: to the agent, to hand the connection on
)

func (a Action) String() string {
	return [...]string{"none", "deliver", "drop", "forward", "schedule"}[a]
}

// ErrIllegal is returned for an event the connection's state does not allow.
var ErrIllegal = fmt.Errorf("illegal transition")

type key struct {
	role  Role
	state State
	ev    Event
}

type step struct {
	to  State
	act Action
}

// transitions is the whole state machine: seed 4.8.1 for the FE, 4.8.2 and
// 4.8.3 for the BE. Closed stands for "no entry". A (role, state, event)
// that is not listed is illegal.
var transitions = map[key]step{}

func init() {
	type row struct {
		role  Role
		from  []State
		evs   []Event
		to    State // same: stay in from
		act   Action
		_note string
	}
	// same marks a row whose events leave the state as it is. (Closed is
	// the zero State, so zero cannot mean that.)
	const same State = 255
	packets := []Event{EvFIN, EvRST, EvACK, EvPayload}
	rows := []row{
		// FE.
		{FE, []State{Closed}, []Event{EvHandoffStart}, Handoffing, ActNone, "request read, BE chosen"},
		{FE, []State{Closed}, append([]Event{EvSYN}, packets...), same, ActDeliver, "not handed off: the FE's own"},
		{FE, []State{Handoffing}, []Event{EvHandoffAcked}, Handoffed, ActNone, "BE acked: forward"},
		{FE, []State{Handoffing}, []Event{EvHandoffFailed}, Closed, ActNone, "FE keeps the connection"},
		{FE, []State{Handoffing}, packets, same, ActDrop, "atomic handoff"},
		{FE, []State{Handoffing, Handoffed, TimeWait}, []Event{EvSYN}, same, ActDeliver, "SYNs are always local"},
		{FE, []State{Handoffed}, []Event{EvFIN, EvRST}, TimeWait, ActForward, "seed 4.8.1 step 3"},
		{FE, []State{Handoffed}, []Event{EvACK, EvPayload}, same, ActForward, ""},
		{FE, []State{Handoffed, TimeWait}, []Event{EvTimer}, Closed, ActNone, "idle, or TIME_WAIT over"},
		{FE, []State{Handoffed, TimeWait}, []Event{EvHandoffStart}, Handoffing, ActNone, "client reused its port"},
		{FE, []State{TimeWait}, packets, same, ActForward, "the close completes at the BE"},
		// BE.
		{BE, []State{Closed}, []Event{EvRestored}, Established, ActNone, "rebuilt and committed"},
		{BE, []State{Closed}, append([]Event{EvSYN}, packets...), same, ActDeliver, "not ours"},
		{BE, []State{Established}, []Event{EvFIN, EvRST}, TimeWait, ActDeliver, ""},
		{BE, []State{Established, WillHandoff, TimeWait}, []Event{EvACK, EvSYN}, same, ActDeliver, ""},
		{BE, []State{Established}, []Event{EvPayload}, same, ActDeliver, "scheduled to this BE"},
		{BE, []State{Established}, []Event{EvReschedule}, WillHandoff, ActSchedule, "scheduled to another BE"},
		{BE, []State{WillHandoff}, []Event{EvFIN, EvRST}, TimeWait, ActDeliver, ""},
		{BE, []State{WillHandoff}, []Event{EvPayload, EvReschedule}, same, ActDrop, "one new request at a time"},
		{BE, []State{WillHandoff}, []Event{EvHandoffStart}, Handoffing, ActNone, "socket still ESTABLISHED"},
		{BE, []State{WillHandoff}, []Event{EvHandoffFailed}, Established, ActNone, "not all acked in time: serve it here"},
		{BE, []State{Handoffing}, append([]Event{EvSYN, EvReschedule}, packets...), same, ActDrop, ""},
		{BE, []State{Handoffing}, []Event{EvHandoffAcked}, Handoffed, ActNone, ""},
		{BE, []State{Handoffing}, []Event{EvHandoffFailed}, Established, ActNone, "serve it here after all"},
		{BE, []State{Handoffed}, append([]Event{EvSYN, EvReschedule}, packets...), same, ActForward, "until the FE switches"},
		{BE, []State{Handoffed}, []Event{EvFEAcked, EvTimer}, Closed, ActNone, "seed: delete at once"},
		{BE, []State{TimeWait}, []Event{EvFIN, EvRST, EvPayload, EvReschedule}, same, ActDeliver, ""},
		{BE, []State{TimeWait}, []Event{EvTimer}, Closed, ActNone, ""},
	}
	for _, r := range rows {
		for _, from := range r.from {
			for _, ev := range r.evs {
				to := r.to
				if to == same {
					to = from
				}
				k := key{r.role, from, ev}
				if _, dup := transitions[k]; dup {
					panic(fmt.Sprintf("conntab: transition %v %v %v listed twice", r.role, from, ev))
				}
				transitions[k] = step{to, r.act}
			}
		}
	}
}

// Step returns the state a connection of role moves to from state on ev,
// and what happens to the packet behind a packet event.
func Step(role Role, from State, ev Event) (State, Action, error) {
	s, ok := transitions[key{role, from, ev}]
	if !ok {
		return from, ActNone, fmt.Errorf("%v %v on %v: %w", role, from, ev, ErrIllegal)
	}
	return s.to, s.act, nil
}

// PacketEvent classifies a TCP segment by its flags and payload length.
func PacketEvent(syn, fin, rst bool, payload int) Event {
	switch {
	case rst:
		return EvRST
	case syn:
		return EvSYN
	case fin:
		return EvFIN
	case payload > 0:
		return EvPayload
	}
	return EvACK
}
