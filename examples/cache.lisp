;;;; cache.lisp -- a cache that fills up to a fixed size and then stops growing: growth that
;;;; memory_trend must not call a leak once it has stopped.
;;;;
;;;; Run:  sbmon launch -- --load examples/cache.lisp
;;;;
;;;; On top of churn.lisp's garbage, it adds about 256 KiB a second to a hash table until the
;;;; table holds 2,000 entries (about 5 MiB, some 20 seconds); from then on it only serves
;;;; lookups. (A cache that keeps replacing its entries is harder: the values it drops have
;;;; aged into older generations, and look retained until those are collected.)

(load (merge-pathnames "churn.lisp" (or *load-truename* *default-pathname-defaults*)))

(in-package #:sbmon-example)

(defparameter *cache-entries* 2000)
(defvar *cache* (make-hash-table))
(defvar *requests* 0)

(every-tick
 (lambda ()
   (dotimes (i 10)
     (let ((key (mod (incf *requests*) *cache-entries*)))
       (unless (gethash key *cache*)
         (setf (gethash key *cache*) (make-array 320 :element-type 'fixnum)))))))
