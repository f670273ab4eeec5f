;;;; sbmon-agent.asd -- ASDF system for the sbmon agent (lisp/sbmon-agent.lisp).
;;;; Plain (load "lisp/sbmon-agent.lisp") works too; ASDF is only a convenience.

(defsystem "sbmon-agent"
  :description "In-image agent for sbmon: serves heap, GC, thread and runtime figures over a local socket."
  :version "0.1.0"
  ;; the heap and control parts, loaded by the agent on first use from beside sbmon-agent.lisp
  :components ((:file "sbmon-agent")
               (:static-file "sbmon-agent-heap.lisp")
               (:static-file "sbmon-agent-control.lisp")))
